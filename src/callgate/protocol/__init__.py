"""The wire protocol: typed messages and the codec. Pure: no I/O, no clock."""
