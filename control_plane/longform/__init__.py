"""Long recordings split across the fleet (docs/architecture.md, "Long recordings"): where a
recording is cut (cuts.py) and how the pieces' answers become one (answers.py). Pure: no I/O."""
