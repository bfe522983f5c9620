"""The course kit: the handout generator, the graded tests and the wrong answers
(README, "For instructors")."""
