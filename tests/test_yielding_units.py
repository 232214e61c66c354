"""Which workers give way to waiting regular jobs (slurm_jobs/yielding.py), without Slurm."""

from __future__ import annotations

from slurm_jobs.capacity import NodeRoom
from slurm_jobs.slurm import parse_scontrol
from slurm_jobs.yielding import Departures, QueuedJob, choose_yields

# One pending regular job and one running worker as Slurm 22.05's `scontrol -o show job` prints them
# (fields this module does not read left out).
PENDING_LINE = ("JobId=41 JobName=wrap UserId=root(0) GroupId=root(0) Priority=4294901759 Nice=0 JobState=PENDING "
                "Reason=Resources Dependency=(null) PreemptEligibleTime=2026-12-04T02:40:01 PreemptTime=None "
                "Partition=regular NodeList=(null) NumNodes=2-2 NumCPUs=2 TRES=cpu=2,node=2,billing=2 "
                "TresPerNode=gres:gpu:1")
WORKER_LINE = ("JobId=17 ArrayJobId=16 ArrayTaskId=1 JobName=chatai-worker-llama UserId=root(0) Priority=1 "
               "JobState=RUNNING Reason=None PreemptTime=None Partition=scavenger NodeList=node2 NumNodes=1 "
               "TresPerNode=gres:gpu:1")


def job(job_id: str, state: str, partition: str, node_list: str = "(null)", nodes: int = 1, gpus: int = 1,
        worker: bool = False, reason: str = "Resources", priority: int = 100, preempting: bool = False) -> QueuedJob:
    return QueuedJob(job_id=job_id, task_id=job_id, name="chatai-worker-m" if worker else "sim", state=state,
                     reason=reason, partitions=frozenset(partition.split(",")), priority=priority, nodes=nodes,
                     node_list=node_list, gpus_per_node=gpus, preempting=preempting)


def worker(job_id: str, node: str, gpus: int = 1, preempting: bool = False) -> QueuedJob:
    return job(job_id, "RUNNING", "scavenger", node, gpus=gpus, worker=True, reason="None", preempting=preempting)


def node(name: str, gpus: int = 1, allocated: int = 1, partitions: str = "regular,scavenger") -> NodeRoom:
    return NodeRoom(name, True, tuple(partitions.split(",")), {"cpu": 8, "gres/gpu": gpus}, {"gres/gpu": allocated})


def test_scontrol_lines_are_read_as_slurm_prints_them():
    pending = QueuedJob.from_scontrol(parse_scontrol(PENDING_LINE))
    assert (pending.job_id, pending.state, pending.reason, pending.nodes, pending.gpus_per_node) == \
        ("41", "PENDING", "Resources", 2, 1)
    assert pending.partitions == {"regular"} and not pending.preempting and not pending.is_worker
    w = QueuedJob.from_scontrol(parse_scontrol(WORKER_LINE))
    assert (w.job_id, w.task_id, w.node_list, w.is_worker, w.gpus_per_node) == ("17", "16_1", "node2", True, 1)
    told = QueuedJob.from_scontrol(parse_scontrol(WORKER_LINE.replace("PreemptTime=None",
                                                                      "PreemptTime=2026-12-04T02:41:07")))
    assert told.preempting


def test_gpus_are_read_from_newer_slurms_and_from_per_job_requests():
    newer = QueuedJob.from_scontrol(parse_scontrol(PENDING_LINE.replace("gres:gpu:1", "gres/gpu:a100:2")))
    assert newer.gpus_per_node == 2
    per_job = QueuedJob.from_scontrol(parse_scontrol(PENDING_LINE.replace("TresPerNode=gres:gpu:1",
                                                                          "TresPerJob=gres:gpu:3")))
    assert per_job.gpus_per_node == 2  # 3 GPUs over 2 nodes: at least 2 on one of them
    cpu_only = QueuedJob.from_scontrol(parse_scontrol(PENDING_LINE.replace(" TresPerNode=gres:gpu:1", "")))
    assert cpu_only.gpus_per_node == 0 and not cpu_only.waits_for_gpus("scavenger")


def test_a_burst_gets_as_many_workers_as_it_needs_in_one_round():
    nodes = [node(f"n{i}") for i in range(4)]
    workers = [worker(f"w{i}", f"n{i}") for i in range(4)]
    burst = [job("1", "PENDING", "regular"), job("2", "PENDING", "regular", reason="Priority"),
             job("3", "PENDING", "regular", reason="Priority")]
    assert sorted(choose_yields(workers + burst, nodes, "scavenger")) == ["w0", "w1", "w2"]


def test_free_gpus_are_taken_first_and_workers_slurm_already_preempts_count_as_leaving():
    nodes = [node("n0", allocated=0)] + [node(f"n{i}") for i in range(1, 4)]
    workers = [worker("w1", "n1", preempting=True), worker("w2", "n2"), worker("w3", "n3")]
    burst = [job(str(i), "PENDING", "regular") for i in range(3)]
    chosen = choose_yields(workers + burst, nodes, "scavenger")
    assert len(chosen) == 1 and chosen[0] in ("w2", "w3")
    assert choose_yields(workers + burst, nodes, "scavenger", leaving={"w2"}) == []
    fourth = job("3", "PENDING", "regular", reason="Priority")
    assert choose_yields(workers + burst + [fourth], nodes, "scavenger", leaving={"w2"}) == ["w3"]


def test_the_least_busy_worker_goes_and_a_node_that_needs_fewer_yields_is_preferred():
    nodes = [node("big", gpus=4, allocated=4), node("half", gpus=4, allocated=2)]
    workers = [worker("b1", "big"), worker("b2", "big"), worker("b3", "big"), worker("b4", "big"),
               worker("h1", "half"), worker("h2", "half")]
    two = job("9", "PENDING", "regular", gpus=3)
    assert choose_yields(workers + [two], nodes, "scavenger") == ["h1"]  # 2 free + 1 worker on "half"
    busy = {"h1": 5, "h2": 0}
    assert choose_yields(workers + [two], nodes, "scavenger", busy) == ["h2"]
    in_array = [QueuedJob(**{**vars(w), "task_id": f"40_{i}"}) for i, w in enumerate(workers)]
    busy_by_task = {"40_4": 5, "40_5": 0}  # heartbeats carry the array task id, as scancel takes it
    assert choose_yields(in_array + [two], nodes, "scavenger", busy_by_task) == ["40_5"]


def test_a_multi_node_job_frees_a_gpu_on_each_of_its_nodes():
    nodes = [node(f"n{i}") for i in range(3)]
    workers = [worker(f"w{i}", f"n{i}") for i in range(3)]
    wide = job("5", "PENDING", "regular", nodes=3)
    assert sorted(choose_yields(workers + [wide], nodes, "scavenger")) == ["w0", "w1", "w2"]
    too_wide = job("6", "PENDING", "regular", nodes=4)
    assert choose_yields(workers + [too_wide], nodes, "scavenger") == []


def test_jobs_that_no_yield_lets_start_take_nothing():
    nodes = [node("n0"), node("n1")]
    regular_running = job("7", "RUNNING", "regular", "n0", reason="None")
    workers = [worker("w1", "n1")]
    blocked = job("8", "PENDING", "regular", nodes=2, priority=200)  # n0 is a regular job's
    small = job("9", "PENDING", "regular", priority=100)
    unfit: list[tuple[str, int]] = []
    assert choose_yields([regular_running, *workers, blocked, small], nodes, "scavenger",
                         on_unfit=lambda j, found: unfit.append((j.job_id, found))) == ["w1"]
    assert unfit == [("8", 1)]  # the log says which job is left to Slurm and how far it got


def test_only_jobs_waiting_for_resources_outside_the_workers_partition_and_on_shared_nodes_count():
    nodes = [node("n0"), node("n1", partitions="scavenger,gpu-b")]
    workers = [worker("w0", "n0"), worker("w1", "n1")]
    held = job("1", "PENDING", "regular", reason="JobHeldUser")
    assert job("0", "PENDING", "regular", reason="None").waits_for_gpus("scavenger")  # just submitted
    depends = job("2", "PENDING", "regular", reason="Dependency")
    scavenger = job("3", "PENDING", "scavenger")
    assert choose_yields(workers + [held, depends, scavenger], nodes, "scavenger") == []
    other_nodes = job("4", "PENDING", "gpu-b")
    assert choose_yields(workers + [other_nodes], nodes, "scavenger") == ["w1"]
    either = job("5", "PENDING", "regular,gpu-b")
    assert len(choose_yields(workers + [either], nodes, "scavenger")) == 1


def test_higher_priority_jobs_are_served_first():
    nodes = [node("n0")]
    workers = [worker("w0", "n0")]
    low = job("1", "PENDING", "regular", priority=10)
    high = job("2", "PENDING", "regular", priority=500, gpus=2)  # cannot fit on a 1-GPU node
    assert choose_yields(workers + [low, high], nodes, "scavenger") == ["w0"]


def test_a_worker_told_to_go_that_does_not_say_it_drains_is_told_again():
    slurm_told, we_told, gone = worker("w1", "n1", preempting=True), worker("w2", "n2"), worker("w3", "n3")
    d = Departures(after=3.0)
    d.observe([slurm_told, we_told, gone], now=100.0)
    d.told(["w2", "w3"], now=100.0)
    assert "w1" in d and "w2" in d
    assert d.unheard({}, now=102.9) == []  # too soon to tell
    d.observe([slurm_told, we_told], now=103.0)  # w3's job ended
    heard = {"w2": "draining"}
    assert d.unheard(heard, now=103.0) == ["w1"]  # no heartbeat says w1 heard Slurm's SIGTERM
    assert d.unheard({"w1": "ready", "w2": "draining"}, now=103.0) == ["w1"]
    d.told(["w1"], now=103.0)
    assert d.unheard({"w1": "stopped", **heard}, now=107.0) == []
    d.observe([slurm_told], now=108.0)  # still preempting: remembered from its first sighting, not reset
    assert d.told_at == {"w1": 103.0}
    d.observe([], now=109.0)
    assert "w1" not in d and d.unheard({}, 200.0) == []
