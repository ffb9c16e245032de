package ferry

import scala.collection.mutable.ArrayBuffer
import scala.jdk.CollectionConverters._
import scala.util.control.NonFatal

import org.apache.parquet.column.statistics.Statistics
import org.apache.parquet.hadoop.util.HadoopInputFile
import org.apache.spark.sql.DataFrame
import org.apache.spark.sql.execution.FileSourceScanExec
import org.apache.spark.sql.execution.datasources.FilePartition
import org.apache.spark.sql.execution.datasources.parquet.{ParquetFileFormat, ParquetFooterReader}
import org.slf4j.LoggerFactory

import ferry.ConvolvePlan.{PartitionPlan, RunInfo}

/**
 * Convolve's runs read from Parquet footers instead of from a pass over the ids.
 *
 * For a plain Parquet scan (no filters), each task reads the row groups of its file splits in
 * file order, and each row group's footer statistics give its id range and row count. When
 * every row group's ids fill their range exactly (max - min + 1 = rows, no nulls), the
 * partition's runs of consecutive ids follow from the footers alone: a row group continuing the
 * previous one extends its run. What the footers cannot say is the order of the ids inside a
 * row group, so a plan from them is marked unordered: the heads job and the compute pass then
 * place each row by its id ([[ConvolvePlan.readHeadsAnyOrder]], `Convolve.RunMessages`), which
 * costs nothing while the rows do come in order. Any doubt (another format or plan shape, a
 * row group without statistics or with gaps, more file splits than [[MaxFooterReads]]) returns
 * None and the id pass plans as before.
 *
 * The row groups of a split are found by the call Spark's own Parquet reader makes
 * (`ParquetFooterReader.buildFilter` on the split's range), so they are the ones the task reads.
 */
private[ferry] object ParquetRuns {

  private val log = LoggerFactory.getLogger(getClass)

  /**
   * Footers are read on the driver, here one per file split and for the null check one per
   * file: above this many, a job (the id pass, the null query) is cheaper to start.
   */
  val MaxFooterReads = 256

  /**
   * Each partition's runs of `columns` (id first), as the planning pass would find them, or
   * None when the footers cannot say. `partitions` is the number of partitions of the scan the
   * compute pass reads (checked against the scan found here).
   */
  def plans(columns: DataFrame, partitions: Int, maxRuns: Int): Option[Array[PartitionPlan]] = try {
    val scans = columns.queryExecution.executedPlan.collect { case s: FileSourceScanExec => s }
    if (scans.length != 1) return None
    val scan = scans.head
    if (!scan.relation.fileFormat.isInstanceOf[ParquetFileFormat] || scan.dataFilters.nonEmpty ||
      scan.partitionFilters.nonEmpty || scan.bucketedScan) return None
    val idName = columns.schema.fieldNames.head
    if (!scan.requiredSchema.fieldNames.exists(_.equalsIgnoreCase(idName))) return None
    val parts = scan.inputRDD.partitions
    if (parts.length != partitions || !parts.forall(_.isInstanceOf[FilePartition])) return None
    val files = parts.map(_.asInstanceOf[FilePartition])
    if (files.iterator.map(_.files.length).sum > MaxFooterReads) return None
    val hconf = columns.sparkSession.sparkContext.hadoopConfiguration
    val out = files.map { fp =>
      val runs = ArrayBuffer.empty[RunInfo]
      var start = 0L
      var len = 0L
      var runRow = 0L
      var row = 0L
      fp.files.foreach { f =>
        val footer = ParquetFooterReader.readFooter(HadoopInputFile.fromPath(f.toPath, hconf),
          ParquetFooterReader.buildFilter(hconf, f, false))
        footer.getBlocks.asScala.foreach { block =>
          val rows = block.getRowCount
          if (rows > 0) {
            val chunk = block.getColumns.asScala.find(c => c.getPath.size == 1 &&
              c.getPath.toDotString.equalsIgnoreCase(idName)).getOrElse(return None)
            val (lo, hi) = idRange(chunk.getStatistics).getOrElse(return None)
            if (hi - lo + 1 != rows) return None
            if (len > 0 && lo == start + len) len += rows
            else {
              if (len > 0) runs += RunInfo(start, len, runRow)
              start = lo
              len = rows
              runRow = row
            }
            row += rows
          }
        }
      }
      if (len > 0) runs += RunInfo(start, len, runRow)
      if (runs.length > maxRuns) return None // the id pass re-lays the series out
      PartitionPlan(fp.index, runs.toArray, abandoned = false, row)
    }
    Some(out)
  } catch {
    case NonFatal(e) =>
      log.debug(s"Convolve plans with a pass over the ids: the Parquet footers were not read (${e.getMessage})")
      None
  }

  /** (min, max) of an integer column chunk whose statistics count no nulls. */
  private def idRange(st: Statistics[_]): Option[(Long, Long)] =
    if (st == null || st.isEmpty || !st.hasNonNullValue || !st.isNumNullsSet || st.getNumNulls != 0) None
    else (st.genericGetMin, st.genericGetMax) match {
      case (lo: java.lang.Long, hi: java.lang.Long) => Some((lo.longValue, hi.longValue))
      case (lo: java.lang.Integer, hi: java.lang.Integer) => Some((lo.longValue, hi.longValue))
      case _ => None
    }
}
