"""The graded tests, one file per exercise of EXERCISES.md."""
