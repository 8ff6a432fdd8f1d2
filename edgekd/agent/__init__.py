"""The benchmark agent that runs on a device (Jetson, Raspberry Pi, any Linux box): `python -m edgekd.agent`.

Everything in this package imports only the standard library, numpy and the runtime a job uses (ONNX Runtime,
LiteRT / tflite-runtime, TensorRT's trtexec), never torch or the rest of edgekd, so the folder runs on a board
that has nothing else installed. `server.py` is the HTTP service, `bench.py` the per-job child process that
loads and times a model, `protocol.py` what host and agent both need (upload layout, request fields, limits).
"""
