from vggfeat.cli import cli

cli(prog_name="vggfeat")
