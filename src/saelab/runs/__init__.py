"""The run folder as files: its layout, its one writer, safe writes, and checkpoint files."""
