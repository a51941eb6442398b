"""What a run's numbers and networks become: figures, report.md, the sweep summary and its
statistics, the robustness study, and the codes exported."""
