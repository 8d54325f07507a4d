"""A small TensorBoard scalar writer built on TensorFlow's event files.

`tf.summary.scalar` needs the `tensorboard` package, which is not a dependency. This
writer builds the same records itself: one `Summary` protocol buffer per step holding
every scalar (tagged for TensorBoard's 'scalars' plugin), written with one
`tf.summary.experimental.write_raw_pb` call, so an epoch costs one TF op instead of one
per scalar. `tensorboard --logdir <workdir>/tensorboard` shows them.
"""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf
from tensorflow.core.framework import summary_pb2, tensor_pb2, types_pb2


class SummaryWriter:
    """Scalars of one fold and phase under `logdir`."""

    def __init__(self, logdir: str):
        self._writer = tf.summary.create_file_writer(logdir)
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Writes `values` (tag -> number) at `step`."""
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, metadata=self._metadata,
                                      tensor=tensor_pb2.TensorProto(
                                          dtype=types_pb2.DT_FLOAT, float_val=[float(v)]))
            for tag, v in values.items()])
        with self._writer.as_default():
            tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
