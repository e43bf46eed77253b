"""The `astraea` subcommands, one module each (`demo` holds demo and
train-demo): its parser (`add_parser`) and `run(args)`; `common` holds the
value types, shared options and the error handler; `cli` assembles them.
File I/O of the commands lives here."""
