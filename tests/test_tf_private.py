"""The private TF/Keras APIs wrapped in tengrad_tf._tf_private still behave as relied upon."""

import tensorflow as tf

from tengrad_tf import _tf_private


def test_in_xla_context():
    seen = []

    def probe(x):
        seen.append(_tf_private.in_xla_context())
        return x

    tf.function(probe, jit_compile=True)(tf.constant(1.0))
    tf.function(probe)(tf.constant(1.0))
    probe(tf.constant(1.0))
    assert seen == [True, False, False]


def test_tape_is_recording():
    assert not _tf_private.tape_is_recording()
    with tf.GradientTape():
        assert _tf_private.tape_is_recording()
    assert not _tf_private.tape_is_recording()


def test_keras_mask_round_trip_and_losses_apply_it():
    import keras
    import numpy as np

    embedded = keras.layers.Embedding(5, 2, mask_zero=True)(np.array([[1, 0], [2, 3]]))
    np.testing.assert_array_equal(_tf_private.keras_mask(embedded).numpy(),
                                  [[True, False], [True, True]])
    assert _tf_private.keras_mask(tf.constant(1.0)) is None
    loss = keras.losses.MeanSquaredError()
    y_pred = tf.constant([[[1.0], [5.0]], [[2.0], [2.0]]])
    y_true = tf.zeros_like(y_pred)
    masked = tf.identity(y_pred)
    _tf_private.set_keras_mask(masked, tf.constant([[True, False], [True, True]]))
    assert _tf_private.keras_mask(masked) is not None
    # Keras's Loss.__call__ reads the mask: the masked 25 is left out, the mean is over 3 entries.
    assert float(loss(y_true, y_pred)) == (1 + 25 + 4 + 4) / 4
    assert float(loss(y_true, masked)) == (1 + 4 + 4) / 3


def test_outer_graph_leads_from_a_cond_branch_to_its_function():
    seen = {}

    @tf.function
    def f(x):
        seen["function"] = tf.compat.v1.get_default_graph()

        def branch():
            seen["branch"] = tf.compat.v1.get_default_graph()
            return x

        return tf.cond(x > 0, branch, lambda: -x)

    f(tf.constant(1.0))
    assert seen["branch"] is not seen["function"]
    assert _tf_private.outer_graph(seen["branch"]) is seen["function"]
    outermost = _tf_private.outer_graph(seen["function"])  # the global graph tf.function runs in
    assert outermost is not None and _tf_private.outer_graph(outermost) is None


def test_compile_loss_is_the_container_compile_builds():
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    containers = [v for v in vars(model).values() if _tf_private.is_compile_loss(v)]
    assert len(containers) == 1  # compile built one, and it is recognized
    assert not _tf_private.is_compile_loss(keras.losses.MeanSquaredError())


def test_seed_generator_states_are_the_random_layers_states_and_rewinding_repeats_a_draw():
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((6,)), keras.layers.BatchNormalization(),
                              keras.layers.Dense(4), keras.layers.Dropout(0.5),
                              keras.layers.GaussianNoise(1.0)])
    states = _tf_private.seed_generator_states(model)
    assert len(states) == 2  # Dropout's and GaussianNoise's, not BatchNorm's statistics
    x = np.random.default_rng(0).normal(size=(3, 6)).astype("float32")
    before = [v.numpy() for v in states]
    first = model(x, training=True).numpy()
    assert not np.array_equal(model(x, training=True).numpy(), first)  # the states advanced
    for v, value in zip(states, before):
        v.assign(value)
    np.testing.assert_array_equal(model(x, training=True).numpy(), first)
    plain = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    assert _tf_private.seed_generator_states(plain) == []
