"""Test bed shared by the tests, `make demo` and `make bench`: a cohort generator and a throwaway Orthanc."""
