"""TENGraD for TensorFlow/Keras 3: natural gradient descent with exact Fisher-block inverses."""

from tengrad_tf.optimizer import BindingError, TENGraD

__version__ = "0.1.0"
__all__ = ["BindingError", "TENGraD", "__version__"]
