"""Reading a finished (or running) sweep: `lab confirm` and `lab report`."""
