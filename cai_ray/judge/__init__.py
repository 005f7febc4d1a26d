"""Judging policy outputs: rubrics and strict verdict parsers (pure), plus the serving side."""
