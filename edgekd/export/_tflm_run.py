"""Child process for edgekd.export.tflm: one TFLite Micro interpreter with one arena size.

Run as a script (not imported) so it starts in a fraction of a second without torch, and so an arena that is
too small, which can abort the whole process inside TFLM, only ends this child.

usage: python _tflm_run.py MODEL.tflite ARENA_BYTES [INPUTS.npy OUTPUTS.npy]
Prints one JSON line; exit 0 when the model allocated (and ran every input), 3 when allocation failed.
TFLM's own messages (missing kernels, the allocation report) go to stderr.
"""
import json
import sys

import numpy as np
from tflite_micro.python.tflite_micro import runtime


def main() -> int:
    model, arena = sys.argv[1], int(sys.argv[2])
    try:
        interpreter = runtime.Interpreter.from_file(model, arena_size=arena)
    except RuntimeError as e:
        print(json.dumps({"ok": False, "stage": "allocate", "error": str(e)}), flush=True)
        return 3
    if len(sys.argv) > 4:
        inputs = np.load(sys.argv[3])
        outputs = []
        for x in inputs:
            interpreter.set_input(x, 0)
            interpreter.invoke()
            outputs.append(np.array(interpreter.get_output(0)).copy())
        np.save(sys.argv[4], np.stack(outputs))
    sys.stderr.flush()
    interpreter.print_allocations()  # "[RecordingMicroAllocator] Arena allocation total N bytes" on stderr
    detail = interpreter.get_input_details(0)
    print(json.dumps({"ok": True, "input_shape": [int(s) for s in detail["shape"]],
                      "input_dtype": np.dtype(detail["dtype"]).name}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
