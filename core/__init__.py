"""Floor 0: the run contract and its primitives (atomic files, typed-config machinery, the stage
registry, the run directory). Imports nothing else of the project, so every stage package may
use it (docs/architecture.md, "Package floors")."""
