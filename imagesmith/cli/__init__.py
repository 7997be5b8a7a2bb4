"""The command line: `imagesmith VERB ...` (main.py), its parser (parser.py)
and what each verb does (commands.py). Only this package turns errors into
messages and exit codes."""
