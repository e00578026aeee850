"""TENGraD for TensorFlow/Keras 3: natural gradient descent with exact Fisher-block inverses."""

from tengrad_tf.optimizer import TENGraD
from tengrad_tf.kfac import KFAC
from tengrad_tf.record import AmbiguousStepError, BindingError
from tengrad_tf.preconditioned import PreconditionedOptimizer
from tengrad_tf import callbacks  # tengrad_tf.callbacks.StepCounters after `import tengrad_tf`

__version__ = "0.1.0"
__all__ = ["AmbiguousStepError", "BindingError", "KFAC", "PreconditionedOptimizer", "TENGraD", "__version__", "callbacks"]
