from .scheduling_tarflow import GuidanceSpec, TarFlowScheduler, TarFlowSchedulerOutput
