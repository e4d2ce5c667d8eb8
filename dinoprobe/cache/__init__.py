"""The feature cache, the contract between extraction and everything after it: HDF5 shards plus a manifest
(`store`), feature specs (`specs`), and the readers that turn a cache into training arrays (`arrays`, `stream`)."""
