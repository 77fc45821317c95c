"""The test suite (a package, so that `from tests.test_train import ...`
resolves to these files even where another installed distribution ships a
top-level `tests` package, as rt-utils 1.2.7 does)."""
