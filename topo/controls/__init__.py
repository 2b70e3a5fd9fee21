"""The control of every run: null inputs (`nulls`) and the test of whether a topology depends on its data
(`control`)."""
