"""Output formats, one module each. A format owns its file names, how a scheme's roles become file keys, dtypes and
description entries, the config rewrite, its side files, and how a checkpoint of it is read back (for eval); the
checkpoint writer keeps what is common: staging, unit files, parts and the atomic publish."""
