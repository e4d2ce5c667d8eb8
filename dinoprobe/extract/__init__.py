"""Stage 1, images -> cache: data sources, decoding, the evaluation transform, the frozen backbone, and the
extraction run that writes the feature cache (`dinoprobe features`)."""
