"""What the routes call: each module turns API requests into slimtune calls, worker jobs and rows."""
