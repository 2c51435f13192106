"""`UserError`: the mark of an exception that reports a mistake in the user's input (a config
key or value, a data file, weights that do not fit) rather than a bug. The binaries print
such an error as one line (`big_clip.cli`); subclass it together with ValueError etc."""


class UserError(Exception):
  """A mistake in the user's input; the message names the input and the fix."""
