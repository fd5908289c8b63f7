"""`python -m sfckpt` and the `sfckpt` command.

Ctrl-C while the command starts (importing click, numpy, the readers) ends like Ctrl-C later
does: exit 130 and one line, not a KeyboardInterrupt traceback.
"""
import gc
import json
import sys

from .conventions import EXIT_INTERRUPTED, INTERRUPTED, error_document


def run() -> None:
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
