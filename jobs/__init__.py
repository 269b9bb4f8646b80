"""Entry points (python -m jobs.NAME): Ray wiring around fkp_core."""
