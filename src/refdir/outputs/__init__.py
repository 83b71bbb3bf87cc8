"""What leaves a run: the streamed orthogonalized export, the HTML report and the audit page."""
