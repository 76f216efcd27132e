"""Suite-wide settings: on a GPU, every polykern kernel output is filled with NaN before the
kernel writes it (POLYKERN_POISON, read once by the extension), so an unwritten element fails."""
import os

os.environ.setdefault("POLYKERN_POISON", "1")
