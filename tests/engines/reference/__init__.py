"""Reference engine tests (a package: test_engine.py is also the mocker's test module name)."""
