"""Errors raised by tfa-widgets: each names the problem in words a user can act on."""


class TFAError(ValueError):
    """Base class of every error tfa-widgets raises on bad input."""


class InputError(TFAError):
    """An image, label, target, index or setting given by the user is invalid."""


class NonFiniteError(TFAError):
    """An image, a gradient or a score is NaN or infinite."""


class DatasetError(TFAError):
    """A dataset or a file on disk is missing, empty or malformed."""


class IndexCacheError(TFAError):
    """A cached gradient index is truncated, corrupt or built for something else."""


class SaturatedPredictionError(InputError):
    """The test loss gradient is zero or below float precision: every score would be 0.

    The model is certain of the explained class for this test image; explaining another
    class (``target=``) gives a gradient to rank the training images by.
    """
