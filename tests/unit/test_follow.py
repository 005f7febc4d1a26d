"""`cai-ray submit`/`jobs` follow a job through Ray's log tail, polling only when the tail breaks."""

from cai_ray.submit import follow


class Jobs:
    """A job client with the three calls follow makes; the log grows as the tail sends it."""

    def __init__(self, chunks, status="SUCCEEDED", break_after=None):
        self.chunks, self.status, self.break_after, self.downloads = chunks, status, break_after, 0

    async def tail_job_logs(self, job_id):
        for i, chunk in enumerate(self.chunks):
            if i == self.break_after:
                raise RuntimeError("WebSocket connection closed unexpectedly")
            yield chunk

    def get_job_status(self, job_id):
        return f"JobStatus.{self.status}"

    def get_job_logs(self, job_id):
        self.downloads += 1
        return "".join(self.chunks)


def test_the_tail_streams_each_chunk_once_and_the_status_ends_it(capsys):
    jobs = Jobs(["a\n", "b\n"])
    assert follow(jobs, "j1", poll_s=0) == 0
    assert capsys.readouterr().out == "a\nb\njob j1: SUCCEEDED\n"
    assert jobs.downloads == 0


def test_a_broken_tail_falls_back_to_polling_without_repeating_lines(capsys):
    jobs = Jobs(["a\n", "b\n", "c\n"], status="FAILED", break_after=1)
    assert follow(jobs, "j2", poll_s=0) == 1
    assert capsys.readouterr().out == "a\nb\nc\njob j2: FAILED\n"
