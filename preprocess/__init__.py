"""Turn ImageNet-style sources into WebDataset tar shards (see preprocess.shard)."""
