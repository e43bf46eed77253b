"""The embedded demo model: a small text-to-video Wan DiT trained on a
procedural world of coloured shapes (issue #11)."""
