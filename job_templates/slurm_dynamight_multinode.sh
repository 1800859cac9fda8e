#!/bin/bash
# SLURM submission template for DynaMight on several GPUs and nodes: RELION-5's DynaMight job
# (relion_dynamight) or the command line. The single-GPU template is slurm_dynamight.sh.
#
# RELION fills in the XXX...XXX words when it writes <job>/run_submit.script and runs
# "<Queue submit command> <job>/run_submit.script" (Running tab: Submit to queue = Yes,
# Queue submit command = sbatch, Standard submission script = this file, Queue name = partition).
# Nodes, GPUs per node, wall-clock limit and memory come from RELION's extra queue variables;
# set them in the shell that starts the GUI or relion_pipeliner:
#   export RELION_QSUB_EXTRA_COUNT=4
#   export RELION_QSUB_EXTRA1="Wall-clock limit (sbatch --time):"
#   export RELION_QSUB_EXTRA1_DEFAULT=24:00:00
#   export RELION_QSUB_EXTRA2="Memory per node (sbatch --mem):"
#   export RELION_QSUB_EXTRA2_DEFAULT=128G
#   export RELION_QSUB_EXTRA3="Nodes:"
#   export RELION_QSUB_EXTRA3_DEFAULT=1
#   export RELION_QSUB_EXTRA4="GPUs per node:"
#   export RELION_QSUB_EXTRA4_DEFAULT=4
# In the job's GPU field give one id per GPU of a node (e.g. 0,1,2,3 for 4 GPUs per node): every
# node starts one process per id. Half of all processes train half set 1, the other half half
# set 2, so the total (nodes x GPUs per node) must be even.
#
# How it runs: srun starts the command once per node; each copy starts its processes with
# torchrun's engine and joins the others at node 0 (DYNAMIGHT_MASTER) by a static rendezvous.
# Rank 0 (node 0) writes the outputs; node 0's copy writes RELION's exit file.
#SBATCH --job-name=XXXnameXXX
#SBATCH --partition=XXXqueueXXX
#SBATCH --nodes=XXXextra3XXX
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:XXXextra4XXX
#SBATCH --cpus-per-task=XXXthreadsXXX
#SBATCH --time=XXXextra1XXX
#SBATCH --mem=XXXextra2XXX
#SBATCH --output=XXXoutfileXXX
#SBATCH --error=XXXerrfileXXX
#SBATCH --open-mode=append

export OMP_NUM_THREADS=XXXthreadsXXX
export DYNAMIGHT_NNODES=${SLURM_NNODES:-1}
first_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
export DYNAMIGHT_MASTER="${first_node}:$((20000 + ${SLURM_JOB_ID:-0} % 10000))"
echo "DynaMight on ${DYNAMIGHT_NNODES} node(s) from ${first_node}, $(date)"

# one copy per node; SLURM_NODEID tells each copy its node rank
srun --ntasks-per-node=1 --kill-on-bad-exit=1 XXXcommandXXX
status=$?

# A program killed outright (out of memory, SIGKILL after the time limit) cannot write its exit
# file, and RELION would show the job as Running for ever: write the failure here.
job=XXXnameXXX
if [ ! -e "${job}RELION_JOB_EXIT_SUCCESS" ] && [ ! -e "${job}RELION_JOB_EXIT_FAILURE" ] \
        && [ ! -e "${job}RELION_JOB_EXIT_ABORTED" ]; then
    echo "DynaMight ended with status ${status} without an exit file: marking the job failed" >&2
    touch "${job}RELION_JOB_EXIT_FAILURE"
fi
exit ${status}
