"""`python -m sfckpt` and the `sfckpt` command.

Ctrl-C while the command starts (importing click, numpy, the readers) ends like Ctrl-C later
does: exit 130 and one line, not a KeyboardInterrupt traceback.
"""
import gc
import json
import os
import sys

from .conventions import EXIT_INTERRUPTED, INTERRUPTED, error_document


def run() -> None:
    # numpy's OpenBLAS starts a thread per core that spin-waits between the mapping's small products (a
    # product over 200 samples took 5 ms on 2 loaded cores, 0.1 ms on one thread), beside the reader and
    # writer threads that need those cores; set before numpy is imported, and only if the user has not
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        from .cli import main
    except KeyboardInterrupt:
        if "--json" in sys.argv:
            print(json.dumps(error_document(INTERRUPTED, None, EXIT_INTERRUPTED)))
        sys.stderr.write(f"error: {INTERRUPTED}\n")
        sys.exit(EXIT_INTERRUPTED)
    try:
        main(prog_name="sfckpt")
    finally:
        # The interpreter's last collection at exit walks every object left (torch's half a
        # million: about 0.25 s of CPU); the process is ending and its files are already closed.
        gc.freeze()


if __name__ == "__main__":
    run()
