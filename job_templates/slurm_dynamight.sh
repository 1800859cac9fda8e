#!/bin/bash
# SLURM submission template for DynaMight run from RELION: the External job
# (relion_dynamight_external) or RELION-5's DynaMight job (relion_dynamight). One GPU per job.
#
# RELION fills in the XXX...XXX words when it writes <job>/run_submit.script and runs
# "<Queue submit command> <job>/run_submit.script" (Running tab: Submit to queue = Yes,
# Queue submit command = sbatch, Standard submission script = this file, Queue name = partition).
# XXXextra1XXX (wall-clock limit) and XXXextra2XXX (memory) are filled only when RELION is
# started with these set, e.g. in the shell that launches the GUI or relion_pipeliner:
#   export RELION_QSUB_EXTRA_COUNT=2
#   export RELION_QSUB_EXTRA1="Wall-clock limit (sbatch --time):"
#   export RELION_QSUB_EXTRA1_DEFAULT=24:00:00
#   export RELION_QSUB_EXTRA2="Memory (sbatch --mem):"
#   export RELION_QSUB_EXTRA2_DEFAULT=64G
# Otherwise they stay as they are and sbatch rejects them: then delete the --time and --mem lines.
#SBATCH --job-name=XXXnameXXX
#SBATCH --partition=XXXqueueXXX
#SBATCH --ntasks=XXXmpinodesXXX
#SBATCH --cpus-per-task=XXXthreadsXXX
#SBATCH --gres=gpu:1
#SBATCH --time=XXXextra1XXX
#SBATCH --mem=XXXextra2XXX
#SBATCH --output=XXXoutfileXXX
#SBATCH --error=XXXerrfileXXX
#SBATCH --open-mode=append

export OMP_NUM_THREADS=XXXthreadsXXX
echo "DynaMight on $(hostname), GPU(s) ${CUDA_VISIBLE_DEVICES:-none}, $(date)"

XXXcommandXXX
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
