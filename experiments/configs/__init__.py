"""ml_collections configs of the experiment binaries, one file per binary.

Each file defines `get_config(preset)`; it ships in the wheel, so `--config`
can name it from an installed package (see `experiments.common_flags`).
"""
