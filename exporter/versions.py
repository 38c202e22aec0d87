"""Model versions, shared by both sides: the training runs' schema bounds a version's
length, and the prediction side reads the serving version to find its run."""

#: The longest model version a training run may have (characters).
VERSION_MAX_LENGTH = 100
