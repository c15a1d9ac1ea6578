"""Development support: real local processes for the tests, the demo and the benchmark."""
