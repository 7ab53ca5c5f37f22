"""The `sparse-llava` command.

sparse-llava serve [FOLDER_OR_REPO] [flags of `transformers serve`]  serve with transformers' own server (--help);
                   [--image-folder DIR]                              local images from DIR only (else URLs only)
sparse-llava convert --base B --method M --output O [...]            convert a checkpoint (as sparse-llava-convert)
"""

import sys

COMMANDS = ("serve", "convert")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    command, arguments = argv[0], argv[1:]
    if command == "serve":
        from .serving import serve

        serve(arguments)
    elif command == "convert":
        from .convert_llava import main as convert_main

        raise SystemExit(convert_main(arguments))
    else:
        raise SystemExit(f"unknown command {command!r}: expected one of {', '.join(COMMANDS)}\n\n{__doc__.strip()}")


if __name__ == "__main__":
    main()
