"""One module per ``timmface`` subcommand (``train``, ``distill``, ``eval``, ``embed``, ``export``, ...).

Each provides ``add_arguments(parser)`` and ``run(args) -> int``; :mod:`timmface.cli` registers them (its
``COMMANDS`` table) and turns the project's errors into one ``timmface <command>: error: ...`` line.
"""
