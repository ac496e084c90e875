"""The switchboard core: presence, call state and policy. Pure: no I/O, no clock, no randomness."""
