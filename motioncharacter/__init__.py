"""MotionCharacter platform: identity-preserving, motion-controllable human video generation."""
__version__ = "0.1.0"
