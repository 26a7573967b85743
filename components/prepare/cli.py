"""(stub) ``motioncharacter data prepare``."""


def add_commands(sub) -> None:
    return None
