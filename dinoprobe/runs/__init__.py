"""Stage 3, what a trained head leaves behind and how it is used: head files, run directories and their reports,
`predict` and `export`."""
