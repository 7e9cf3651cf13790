"""One process of a 2-process `jax.distributed` search on CPU (run by test_distributed.py)."""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(process_id: int, port: int, seed: int, out: str) -> None:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  import numpy as np

  from plato_jax.knn import ArraySource, search_prefixes

  class RecordingSource(ArraySource):
    reads = []

    def read(self, start, stop):
      self.reads.append((start, stop))
      return super().read(start, stop)

  rng = np.random.default_rng(seed)
  gallery = rng.integers(-2, 3, size=(1100, 8)).astype(np.float32)
  queries = gallery[:70]
  assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
  source = RecordingSource(gallery)
  results = search_prefixes(queries, source, 12, query_ids=np.arange(70), prefix_sizes=[300, 1100],
                   tile_rows=64)
  np.savez(out, reads=np.array(source.reads), **{f"ids{i}": r.ids for i, r in enumerate(results)},
           **{f"scores{i}": r.scores for i, r in enumerate(results)})
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
