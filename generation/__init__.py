"""Sampling K responses per prompt from a policy: `generate.py` (HF or vLLM backend, sharded, resumable),
`merge_data.py` (merge and check shards), `shards.py` (the crash-safe shard files), `vllm_backend.py`."""
