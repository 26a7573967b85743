"""Serving on Triton Inference Server: repository export (``repository``), the Python-backend model
(``backend``), request validation (``request_args``), the server runner (``server``), the client
(``client``) and the ``deploy``/``serve`` commands (``cli``). See serving/README.md."""
