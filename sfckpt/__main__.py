"""`python -m sfckpt` and the `sfckpt` command.

Ctrl-C while the command starts (importing click, numpy, the readers) ends like Ctrl-C later
does: exit 130 and one line, not a KeyboardInterrupt traceback.
"""
import sys


def run() -> None:
    try:
        from .cli import main
    except KeyboardInterrupt:
        if "--json" in sys.argv:
            print('{"version": 1, "error": {"message": "interrupted; nothing was written", "hint": null, '
                  '"exit_code": 130}}')
        sys.stderr.write("error: interrupted; nothing was written\n")
        sys.exit(130)
    main(prog_name="sfckpt")


if __name__ == "__main__":
    run()
