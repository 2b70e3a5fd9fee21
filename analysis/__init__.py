"""Cost accounting, comparison tables, figures and reports."""
