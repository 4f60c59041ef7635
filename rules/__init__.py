"""Shipped rule presets (YAML files), loadable by bare name."""
